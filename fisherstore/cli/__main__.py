"""``python -m fisherstore.cli``: the same as the ``fisherstore`` command."""

from .main import main

raise SystemExit(main())
