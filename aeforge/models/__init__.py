"""One file per method family. Every model follows `aeforge.models.base.AutoencoderModel`."""
