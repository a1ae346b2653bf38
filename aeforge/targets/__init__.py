"""Frozen targets a model learns from and never trains: teachers (features to mimic or distil) and
tokenizers (codes to predict). The `teacher` and `tokenizer` config groups (conf/teacher/, conf/tokenizer/)
point here."""
