"""Container health probe: `python /app/healthcheck.py [/healthz|/readyz]`, exit 0 when it answers 200.

The slim image has no curl or wget; the standard library is enough. The port comes from DEDE_PORT.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "/healthz"
    url = f"http://127.0.0.1:{os.environ.get('DEDE_PORT', '8000')}{path}"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:  # any failure (refused, 503, timeout) just means unhealthy
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
