#!/usr/bin/env bash
# Create (or reuse) the demo customer and print a fresh API key for it.
set -euo pipefail
cd "$(dirname "$0")/.."
key=$(.venv/bin/python manage.py create_customer demo --reuse | tail -n 1)
cat <<EOT

  Demo customer ready. Its API key (shown once):

    $key

  Try:  curl -sS -X POST -H "Authorization: Bearer $key" \\
          --data-binary @../shared/corpus/photo-256k-0.jpg \\
          "http://127.0.0.1:8000/v1/resize?width=256" -o /tmp/thumb.jpg -D -

EOT
