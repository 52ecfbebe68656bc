"""`snapd serve`: the host daemon that restores microVM clones for schedulers (docs/snapd.md)."""
