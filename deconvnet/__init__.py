"""deconvnet: ZFNet and the DeconvNet of Zeiler & Fergus (ECCV 2014), for any image and any CNN."""

__version__ = "0.1.0"
