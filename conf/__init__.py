"""The config tree. It lives at the repository root (conf/) and ships as the package `aeforge.conf`
(pyproject.toml maps it), so `pkg://aeforge.conf` finds it in a checkout and in an installed wheel."""
