"""Scoring maps against annotations (`histodetect slide-eval`): FROC, slide AUC, Dice, results."""
