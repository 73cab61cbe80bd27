"""`python -m unmask ...` is the `unmask` command."""
from .cli import main

raise SystemExit(main())
