"""Images and their index: decoding, the folder / manifest / digits sources, duplicates."""
