"""`python -m service [--bundle DIR] [--port N] ...`: serve a detector bundle (see service/main.py)."""

from service.main import main

main()
