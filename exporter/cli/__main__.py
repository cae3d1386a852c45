"""``python -m exporter.cli``: the same as the ``export-model`` console script."""

from exporter.cli import main

raise SystemExit(main())
