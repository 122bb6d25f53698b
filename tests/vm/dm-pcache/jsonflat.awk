# Flattens JSON into one `path=value` line per scalar, for shell tests that
# have neither jq nor python (the guest has busybox awk):
#
#   {"superblock":{"dialect":"dm-pcache"},"backings":[{"key_tail":{"seg":0,"off":4096}}]}
#
# becomes
#
#   .superblock.dialect="dm-pcache"
#   .backings[0].key_tail.seg=0
#   .backings[0].key_tail.off=4096
#
# Strings keep their quotes and escapes. Long single-line JSON is best split
# into tokens first, which keeps the work linear:
#
#   grep -oE '"([^"\\]|\\.)*"|[-+0-9.eE]+|true|false|null|[][{}:,]' | awk -f jsonflat.awk
#
# but any JSON text works as input.

function here() {
  if (depth == 0) return ""
  if (type[depth] == "a") return path[depth] "[" idx[depth] "]"
  return path[depth] "." key[depth]
}

function token(t, k) {
  if (t == "{" || t == "[") {
    k = here()
    depth++
    type[depth] = (t == "{") ? "o" : "a"
    path[depth] = k
    idx[depth] = 0
    wantkey[depth] = (t == "{")
    return
  }
  if (t == "}" || t == "]") {
    if (depth > 0) depth--
    return
  }
  if (t == ",") {
    if (type[depth] == "a") idx[depth]++
    else wantkey[depth] = 1
    return
  }
  if (t == ":") return
  if (depth > 0 && type[depth] == "o" && wantkey[depth]) {
    k = substr(t, 2, length(t) - 2)
    key[depth] = k
    wantkey[depth] = 0
    return
  }
  print here() "=" t
}

BEGIN { depth = 0 }

{
  line = $0
  while (length(line) > 0) {
    if (match(line, /^[ \t\r]+/)) {
      line = substr(line, RLENGTH + 1)
      continue
    }
    if (match(line, /^"([^"\\]|\\.)*"/) || match(line, /^[-+0-9.eE]+/) ||
      match(line, /^(true|false|null)/) || match(line, /^[][{}:,]/)) {
      token(substr(line, 1, RLENGTH))
      line = substr(line, RLENGTH + 1)
      continue
    }
    # Not JSON: skip one character.
    line = substr(line, 2)
  }
}
