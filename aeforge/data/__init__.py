"""DataModules by modality. Each yields dict batches and declares `modality` (checked against the model)."""
