"""``python -m manager`` runs the ``llmctl`` command."""

from manager.cli import main

raise SystemExit(main())
