"""English names of the ImageNet classes that the project's data sets use (folder names are WordNet ids).

torchvision ships the 1000 English names but not their WordNet ids, so the ids of Imagenette and
Imagewoof are listed here (ImageNet-1k index in brackets, from their READMEs).
"""

from __future__ import annotations

from collections.abc import Sequence

KNOWN_WNIDS: dict[str, str] = {
    # Imagenette
    "n01440764": "tench",  # 0
    "n02102040": "English springer",  # 217
    "n02979186": "cassette player",  # 482
    "n03000684": "chain saw",  # 491
    "n03028079": "church",  # 497
    "n03394916": "French horn",  # 566
    "n03417042": "garbage truck",  # 569
    "n03425413": "gas pump",  # 571
    "n03445777": "golf ball",  # 574
    "n03888257": "parachute",  # 701
    # Imagewoof
    "n02086240": "Shih-Tzu",
    "n02087394": "Rhodesian ridgeback",
    "n02088364": "beagle",
    "n02089973": "English foxhound",
    "n02093754": "Border terrier",
    "n02096294": "Australian terrier",
    "n02099601": "golden retriever",
    "n02105641": "Old English sheepdog",
    "n02111889": "Samoyed",
    "n02115641": "dingo",
}


def english_names(folders: Sequence[str]) -> list[str]:
    """Folder names -> display names: known WordNet ids become English, anything else stays."""
    return [KNOWN_WNIDS.get(f, f) for f in folders]
