"""The paper's analyses, one module each (library functions returning arrays and tables)."""
