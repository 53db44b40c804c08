"""First-party plugins, installed as ``anyad.plugins.*`` and found through entry points."""
