"""`python -m webui [--model NAME] ...` starts the server."""
import sys

from webui.app import main

if __name__ == "__main__":
    sys.exit(main())
