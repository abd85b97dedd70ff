"""Data layer: read any DATA (Kaggle, PCam, store), pack, load uint8 batches, synthesise."""
