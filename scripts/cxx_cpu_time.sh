#!/bin/bash
# c++ under /usr/bin/time: appends "user sys wall object" per compile to $TIMELOG.
# On a loaded machine ninja's wall seconds include the time a compile waits for
# a core; user + sys does not. For scripts/ninja_times.py:
#   rm -rf build && TIMELOG=$PWD/build/cpu.txt CCACHE_DISABLE=1 MAX_JOBS=2 \
#     CXX=$PWD/scripts/cxx_cpu_time.sh python setup.py build_ext --inplace
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
exec /usr/bin/time -f "%U %S %e ${out#*/build/temp*/}" -a -o "$TIMELOG" /usr/bin/c++ "$@"
