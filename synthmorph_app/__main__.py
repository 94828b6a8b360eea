"""Allow ``python -m synthmorph_app``."""

from .cli.run import main

if __name__ == '__main__':  # pragma: no cover
    raise SystemExit(main())
