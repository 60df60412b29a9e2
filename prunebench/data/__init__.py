"""Data: text corpora and calibration windows (`text`), labelled sentence-pair and classification
sets (`labelled`); read in place from a local data root first, then from the Hugging Face Hub."""

from prunebench.data.text import Calibration, calibration_windows, data_roots, find, load_texts, tokenize

__all__ = ["Calibration", "calibration_windows", "data_roots", "find", "load_texts", "tokenize"]
