"""The cells a CSV reader takes for a missing number, one list for every table nic reads.

Empty, and the markers pandas, R and spreadsheets write for a missing number (a number
cannot be named "NA"); in id columns only an empty cell is missing; in a slide-label
class column the same markers but "None" (a class may be called "None").
"""

from __future__ import annotations

__all__ = ["MISSING_NUMBER", "MISSING_CLASS"]

MISSING_NUMBER = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
     "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
)  # fmt: skip

#: cells of a slide-label class column read as missing: the same markers (R writes NA for a
#: missing string) but "None", which names a class ("None", "Mild", "Severe") more often than not
MISSING_CLASS = MISSING_NUMBER - {"None"}
