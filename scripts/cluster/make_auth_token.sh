#!/usr/bin/env bash
# Create the Ray auth token of the placeforge cluster, once, on the machine that runs `ray up`:
# 64 hex characters (256 random bits, the form `ray get-auth-token --generate` writes) in
# ~/.ray/placeforge_auth_token, mode 0600. cluster.yaml copies that file to ~/.ray/auth_token
# on every node; clients name it in RAY_AUTH_TOKEN_PATH. It lives outside the checkout, so it
# is never committed, never in the synced checkout and never in a job's --working-dir upload.
# An existing token is kept; to rotate it, delete the file, run this again, then
# `ray down cluster.yaml && ray up cluster.yaml`.
#   bash scripts/cluster/make_auth_token.sh
set -euo pipefail
token_path="$HOME/.ray/placeforge_auth_token"
if [ -s "$token_path" ]; then
    chmod 600 "$token_path"
    echo "make_auth_token: kept $token_path"
    exit 0
fi
mkdir -p "$(dirname "$token_path")"
tmp="$(mktemp "$token_path.XXXXXX")"  # 0600, next to the token: the mv below is atomic
trap 'rm -f "$tmp"' EXIT
python3 -c 'import secrets; print(secrets.token_hex(32), end="")' > "$tmp"
mv "$tmp" "$token_path"
echo "make_auth_token: created $token_path"
