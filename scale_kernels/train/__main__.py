"""``python -m scale_kernels.train``: the CPT command line (same as the ``scale-cpt`` script)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
