"""LightningModules: the one thin `AEModule` (base.py) and the methods that need their own loop, one file each.
The `module` config group (conf/module/) points here."""
