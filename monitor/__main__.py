"""``python -m monitor`` is the ``tsmon`` command."""

from monitor.cli import main

if __name__ == "__main__":
    main()
