# Helpers shared by the launch scripts (sourced, not run). The sourcing script sets
# LAUNCHER to its own file name first, for the error messages.
# shellcheck shell=bash

die() {
  echo "$LAUNCHER: error: $*" >&2
  echo "Run launch/$LAUNCHER --help for the options." >&2
  exit 2
}

# A word as the shell would need it typed: unquoted when safe, else in single quotes.
quote() {
  local word=$1
  if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

need_value() {  # need_value OPTION "$#"
  (($2 >= 2)) || die "$1 needs a value"
}
