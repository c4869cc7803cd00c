"""The two diagnostic groups of a run: ``data.classes``, negative first, the positive class second.

Every name that depends on the groups is derived here, once: the label of a class name (0/1), the
probability column ``prob_<positive>`` and the per-class keys of metrics (``n_<class>``), so a
CN vs AD run says CN and AD wherever an NC vs MCI run says NC and MCI::

    >>> from petmonai.data.classes import check_classes, class_key, parse_label, prob_column
    >>> classes = check_classes(["CN", "AD"])
    >>> prob_column(classes), class_key("amyloid-positive")
    ('prob_ad', 'amyloid_positive')
    >>> parse_label("ad", classes, "participants.tsv, row 3"), parse_label("n/a", classes, "row 4")
    (1, None)

The challenge's own pair, :data:`petmonai.CLASS_NAMES` (NC, MCI), is what runs saved before
``data.classes`` existed used (:func:`run_classes`) and what library calls default to.
"""

from __future__ import annotations

import re

from petmonai import CLASS_NAMES
from petmonai.errors import ConfigError, PetmonaiError

UNLABELLED = ("", "n/a", "na", "nan", "none", "null")
"""Values of a label cell that mean "no label" (BIDS writes ``n/a``): such a scan is predicted, not trained on."""


def class_key(name: str) -> str:
    """A class name as it appears in column and metric names: lower case, runs of other characters as ``_``."""
    return re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_")


def check_classes(classes, where: str = "data.classes") -> tuple[str, str]:
    """``classes`` as a ``(negative, positive)`` tuple; :class:`ConfigError` naming ``where`` unless it holds
    two distinct, non-empty names (distinct also as :func:`class_key`, which names the columns)."""
    if isinstance(classes, str) or not hasattr(classes, "__len__") or len(classes) != 2:
        raise ConfigError(f"{where}: {classes!r} must list exactly two class names, negative first and the "
                          "positive class second, e.g. [NC, MCI] or [CN, AD]")
    names = tuple(str(c).strip() for c in classes)
    if not all(names) or not all(class_key(n) for n in names):
        raise ConfigError(f"{where}: {list(classes)!r}: a class name must hold a letter or digit")
    if class_key(names[0]) == class_key(names[1]):
        raise ConfigError(f"{where}: {list(names)!r} names one class twice")
    if any(n.lower() in UNLABELLED or n in ("0", "1") for n in names):
        raise ConfigError(f"{where}: {list(names)!r}: '0', '1', 'n/a' and empty values are labels, not class names")
    return names


def run_classes(cfg: dict | None) -> tuple[str, str]:
    """The classes of a (run's) config: ``data.classes``, or the challenge's NC/MCI for a config saved before
    that key existed."""
    classes = ((cfg or {}).get("data") or {}).get("classes")
    return CLASS_NAMES if classes is None else check_classes(classes)


def prob_column(classes=CLASS_NAMES) -> str:
    """The probability column of the positive class: ``prob_mci`` for NC/MCI, ``prob_ad`` for CN/AD."""
    return f"prob_{class_key(classes[1])}"


def count_key(classes, label: int) -> str:
    """``n_<class>``: the per-fold count of one class in ``metrics.json`` (``n_mci``, ``n_nc``)."""
    return f"n_{class_key(classes[label])}"


def parse_label(value, classes, where: str) -> int | None:
    """A label cell: a class name (any case), ``0``/``1``, or empty/``n/a`` (None: unlabelled).

    Anything else is a :class:`PetmonaiError` naming ``where`` (file and row) and the allowed values."""
    text = "" if value is None else str(value).strip()
    if text.lower() in UNLABELLED:
        return None
    for i, name in enumerate(classes):
        if text.lower() == name.lower() or text == str(i):
            return i
    raise PetmonaiError(f"{where}: label '{text}' is not one of the run's classes {list(classes)} (data.classes; "
                        f"0/1 and n/a or an empty cell for unlabelled are accepted too); set "
                        f"--set data.classes=[NEGATIVE,POSITIVE] or correct the value")
