# Sourced by scripts/test_*.sh. make_venv FOLDER PACKAGE...: once, a uv venv at FOLDER that sees the main
# environment (torch, numpy, mor, ...) and holds PACKAGE... installed --no-deps at the given pins;
# FOLDER/.complete marks a finished one (an interrupted one is made again). Needs $PYTHON.
make_venv() {
  local venv=$1
  shift
  command -v uv >/dev/null || "$PYTHON" -m pip install --disable-pip-version-check -q "uv>=0.9"
  if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    uv venv -q --system-site-packages -p "$(command -v "$PYTHON")" "$venv"
    VIRTUAL_ENV="$PWD/$venv" uv pip install -q --no-deps "$@"
    touch "$venv/.complete"
  fi
}
