"""Tables for the terminal and for markdown: numbers rounded, blanks for what is unknown.
"""

import pandas as pd


def as_text(frame: pd.DataFrame) -> str:
    """For the terminal: numbers rounded, blanks for what is unknown, reasons to their first
    clause (the csv files keep them whole)."""
    shown = frame.copy()
    for column in shown.columns:
        if column == "why":
            shown[column] = shown[column].map(lambda text: text.split(": ")[0])
        elif pd.api.types.is_bool_dtype(shown[column]):
            shown[column] = shown[column].map({True: "on", False: "off"})
        elif pd.api.types.is_numeric_dtype(shown[column]) and column != "#":
            shown[column] = shown[column].map(
                lambda value: "" if pd.isna(value) else f"{value:.0f}" if abs(value) >= 10
                else f"{value:.2f}")
    return shown.fillna("").to_markdown(index=False, disable_numparse=True)
