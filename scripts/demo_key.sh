#!/usr/bin/env bash
# Create (or reuse) the demo customer and print its API key: the one kept in var/demo-key (0600) while
# it still works, else a new one (kept there for the next run).
set -euo pipefail
cd "$(dirname "$0")/.."
key=$(.venv/bin/python manage.py create_customer demo --reuse --key-file var/demo-key | tail -n 1)
cat <<EOT

  Demo customer ready. Its API key (also in var/demo-key, printed again by the next run):

    $key

  Try:  curl -sS -X POST -H "Authorization: Bearer $key" \\
          --data-binary @../shared/corpus/photo-256k-0.jpg \\
          "http://127.0.0.1:8000/v1/resize?width=256" -o /tmp/thumb.jpg -D -

EOT
