#!/usr/bin/env bash
# Build dist/edgestate: one executable file for Linux x86_64 that runs without Python
# installed (PyInstaller --onefile; native wheels such as solders and httptools inside).
#   packaging/build.sh            -> dist/edgestate
# Uses its own venv (build/pyinstaller-venv), so the project's .venv stays as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/pyinstaller-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet . 'pyinstaller>=6.10,<7'
# --collect-submodules: hypercorn, quart and friends import some modules by name at runtime.
"$venv/bin/pyinstaller" --onefile --name edgestate --noconfirm --clean --log-level WARN \
    --distpath dist --workpath build/pyinstaller --specpath build/pyinstaller \
    --copy-metadata edgestate --collect-data edgestate \
    --collect-submodules edgestate --collect-submodules hypercorn --collect-submodules quart \
    --collect-submodules quart_trio --collect-submodules solders --collect-submodules httptools \
    --collect-submodules trio_websocket --collect-submodules h2 --collect-submodules wsproto \
    packaging/entry.py
ls -l dist/edgestate
