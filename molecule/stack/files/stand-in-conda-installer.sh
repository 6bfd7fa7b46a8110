#!/bin/bash
# Stand-in for the Miniforge installer (test only: the real one is not reachable from
# the test bed). Called as the role calls the real one, `bash installer.sh -b -p PREFIX`;
# it records each run and lays out what the role uses: PREFIX/bin/conda, which
# answers `conda env create|update --file SPEC` by making PREFIX/envs/NAME/bin/python.
set -eu
prefix=""
while [ $# -gt 0 ]; do
  case "$1" in
    -p) prefix="$2"; shift 2 ;;
    *) shift ;;
  esac
done
[ -n "$prefix" ]
echo "$(date +%s) $prefix" >> /root/stand-in-conda-installer.runs
mkdir -p "$prefix/bin" "$prefix/envs"
cat > "$prefix/bin/conda" <<'CONDA'
#!/bin/bash
set -eu
prev=""
spec=""
for arg in "$@"; do
  if [ "$prev" = "--file" ]; then spec="$arg"; fi
  prev="$arg"
done
prefix="$(cd "$(dirname "$0")/.." && pwd)"
name="$(sed -n 's/^name: //p' "$spec")"
mkdir -p "$prefix/envs/$name/bin"
ln -sf /usr/bin/python3 "$prefix/envs/$name/bin/python"
echo "$*" >> "$prefix/stand-in-conda.log"
CONDA
chmod 0755 "$prefix/bin/conda"
