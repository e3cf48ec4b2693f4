#!/usr/bin/env bash
# CI cache glue for Taidon state bundles: before the tests, import a recipe's prepared state
# from the CI cache; after them, export it there when its key changed.
#
#   taidon-ci.sh key ALIAS           print the cache key: the recipe's final state id,
#                                    planned by the running proxy without a build
#   taidon-ci.sh restore ALIAS DIR   import DIR/ALIAS-KEY.tzst if the cache brought it; a
#                                    refused bundle (damaged, other Postgres major) is
#                                    removed with a warning, and the tests' first
#                                    connection builds the recipe as usual
#   taidon-ci.sh save ALIAS DIR      write DIR/ALIAS-KEY.tzst unless it is there already;
#                                    bundles of the alias's older keys are removed
#
# It talks to a running proxy through sqlrs (start one with `sqlrs --start status`), with
# the config sqlrs finds ($TAIDON_CONFIG, else ./taidon.yaml). SQLRS names another sqlrs.
# Exit status: 0 on a hit, a miss or a save; sqlrs's own status when it fails otherwise
# (no proxy: 4, unknown alias: 5).
set -euo pipefail

SQLRS=${SQLRS:-sqlrs}

usage() {
    echo "usage: $0 key ALIAS | restore ALIAS DIR | save ALIAS DIR" >&2
    exit 2
}

say() { echo "taidon-ci: $*" >&2; }

key_of() { "$SQLRS" explain --key "$1"; }

cmd=${1:-}
alias=${2:-}
[[ -n $cmd && -n $alias ]] || usage
case $cmd in
key)
    [[ $# -eq 2 ]] || usage
    key_of "$alias"
    ;;
restore)
    [[ $# -eq 3 ]] || usage
    dir=$3
    key=$(key_of "$alias")
    file="$dir/$alias-$key.tzst"
    if [[ ! -f $file ]]; then
        say "cache miss for $alias (key ${key:0:12}): its first connection builds it"
        exit 0
    fi
    if out=$("$SQLRS" state import --alias "$alias" "$file" 2>&1); then
        say "$out"
    else
        status=$?
        say "the cached bundle was refused (sqlrs exit $status), removed: $out"
        rm -f -- "$file"
    fi
    ;;
save)
    [[ $# -eq 3 ]] || usage
    dir=$3
    key=$(key_of "$alias")
    file="$dir/$alias-$key.tzst"
    if [[ -f $file ]]; then
        say "$alias is unchanged (key ${key:0:12}): nothing to save"
        exit 0
    fi
    mkdir -p -- "$dir"
    "$SQLRS" prepare "$alias" >/dev/null # builds only what the tests did not
    "$SQLRS" state export "$key" -o "$file" >&2
    shopt -s nullglob
    for old in "$dir/$alias"-*.tzst; do
        if [[ $old != "$file" ]]; then
            rm -f -- "$old"
            say "removed the bundle of an older key: ${old##*/}"
        fi
    done
    say "saved $file"
    ;;
*)
    usage
    ;;
esac
