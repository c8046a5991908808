#!/bin/sh
# Runs one host command per connection (busybox `nc -ll -e`): the first line is a base64-encoded
# script; its output (stdout and stderr) follows, then "__vdt_rc=<exit status>".
read -r encoded
script=/run/vdt-exec.$$
echo "$encoded" | base64 -d >"$script"
sh "$script" </dev/null 2>&1
echo "__vdt_rc=$?"
rm -f "$script"
