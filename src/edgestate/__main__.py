"""``python -m edgestate`` is the ``edgestate`` command."""

from .cli import main

raise SystemExit(main())
