"""The cells a CSV reader takes for a missing number, one list for every table nic reads.

Empty, and the markers pandas, R and spreadsheets write for a missing number (a number
cannot be named "NA"); in id and class columns only an empty cell is missing, so a class
may be called "None" or "NA".
"""

from __future__ import annotations

__all__ = ["MISSING_NUMBER"]

MISSING_NUMBER = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
     "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
)  # fmt: skip
