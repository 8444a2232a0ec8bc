"""``python -m hermes``: the ``hermes`` command."""

from hermes.cli import main

raise SystemExit(main())
