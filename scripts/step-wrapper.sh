#!/bin/sh
# Write the step client's command: step-wrapper.sh PYTHON PACKAGE_DIR OUT
# (the RPM and scripts/install-local.sh both use it).
#
# The plugin runs it once per node per job step (prepare) and once more at the step's
# end (release), so its start-up is the per-step cost: Python starts with -IS (-I -S: no
# site-packages scan, no .pth files, no user environment), and only PACKAGE_DIR, where
# ociimage is installed, is put on the path. The per-step commands need nothing else;
# the rest load the site's packages when they need them (ociimage/step.py: _full_site).
set -eu
[ $# -eq 3 ] || { echo "usage: step-wrapper.sh PYTHON PACKAGE_DIR OUT" >&2; exit 2; }
mkdir -p "$(dirname "$3")"
printf '#!%s -IS\nimport sys\nsys.path.insert(0, "%s")\nfrom ociimage.step import main\nsys.exit(main())\n' \
  "$1" "$2" > "$3"
chmod 0755 "$3"
