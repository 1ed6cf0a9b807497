"""The 1000 ImageNet-1k class names, in the standard sorted-wnid order (index 0 = n01440764 tench).

``imagenet_classes.txt`` beside this module holds one ``wnid<TAB>name`` line per class, the name being the
first lemma of the synset. Source: the synset list and synset-to-lemma table shipped in timm
(``timm/data/_info/imagenet_synsets.txt``, ``imagenet_synset_to_lemma.txt``; timm is Apache-2.0).
A few names repeat (``crane`` the bird and the machine, two ``maillot``): use the index or the wnid to tell
them apart.
"""
import os

__all__ = ["CLASSES_FILE", "imagenet_classes", "imagenet_class_names", "imagenet_wnids"]

CLASSES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.txt")
NUM_CLASSES = 1000

_cache = []


def imagenet_classes():
    """List of 1000 ``(wnid, name)`` pairs in class-index order."""
    if not _cache:
        rows = []
        with open(CLASSES_FILE, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line:
                    continue
                wnid, sep, name = line.partition("\t")
                if not sep or not wnid or not name:
                    raise ValueError("{}:{}: expected 'wnid<TAB>name', got {!r}".format(CLASSES_FILE, lineno, line))
                rows.append((wnid, name))
        if len(rows) != NUM_CLASSES:
            raise ValueError("{} has {} classes, expected {}".format(CLASSES_FILE, len(rows), NUM_CLASSES))
        _cache.extend(rows)
    return list(_cache)


def imagenet_class_names():
    """The 1000 human-readable names, index i = class i."""
    return [name for _, name in imagenet_classes()]


def imagenet_wnids():
    """The 1000 WordNet ids (``n01440764`` ...), sorted, index i = class i."""
    return [wnid for wnid, _ in imagenet_classes()]
