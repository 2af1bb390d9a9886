{{- /*
The few kustomize operations deploy/ uses, applied to parsed objects (dicts, changed in place),
so that the chart renders the overlays' objects from the overlays' own files:

- nw.merge: a strategic merge patch as our patches use it: maps merge key by key, lists of
  maps merge by `mountPath` (volumeMounts) or `name` and put what is new first (as kustomize
  does), any other list is replaced.
- nw.jsonpatch: RFC 6902 `add` and `replace` on one object (the ops our patches use).
- nw.matches: a kustomize patch target (group, version, kind, name as an anchored regex).
- nw.patches: a kustomization's `patches:` on a list of objects (a strategic merge patch names
  its object, `$patch: delete` removes it; a JSON6902 patch needs a target).
- nw.transformers: the builtin NamespaceTransformer (to the release namespace) and
  PatchTransformer of a kustomization's `transformers:` files.
Each returns nothing; a helper that must return a value says so.
*/ -}}

{{- define "nw.merge" -}}
{{- $dst := .dst -}}
{{- range $k, $v := .src -}}
{{- $cur := get $dst $k -}}
{{- if and (kindIs "map" $v) (kindIs "map" $cur) -}}
{{- include "nw.merge" (dict "dst" $cur "src" $v) -}}
{{- else if and (kindIs "slice" $v) (kindIs "slice" $cur) -}}
{{- include "nw.mergeList" (dict "holder" $dst "key" $k "src" $v) -}}
{{- else -}}
{{- $_ := set $dst $k $v -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "nw.mergeList" -}}
{{- $out := get .holder .key -}}
{{- $new := list -}}
{{- $replace := false -}}
{{- range $item := .src -}}
{{- /* a list of scalars, or of maps without a merge key (tolerations): replaced */ -}}
{{- if not (kindIs "map" $item) -}}{{- $replace = true -}}
{{- else if not (or (hasKey $item "mountPath") (hasKey $item "name")) -}}{{- $replace = true -}}{{- end -}}
{{- end -}}
{{- if $replace -}}
{{- $out = .src -}}
{{- else -}}
{{- range $item := .src -}}
{{- $key := "" -}}
{{- /* volumeMounts merge by mountPath (their names may repeat), the rest by name */ -}}
{{- if hasKey $item "mountPath" -}}{{- $key = "mountPath" -}}{{- else -}}{{- $key = "name" -}}{{- end -}}
{{- $found := false -}}
{{- if $key -}}
{{- range $existing := $out -}}
{{- if and (kindIs "map" $existing) (hasKey $existing $key) (eq (toString (get $existing $key)) (toString (get $item $key))) -}}
{{- include "nw.merge" (dict "dst" $existing "src" $item) -}}
{{- $found = true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not $found -}}{{- $new = append $new (deepCopy $item) -}}{{- end -}}
{{- end -}}
{{- /* as kustomize does: what the patch adds comes first, in the patch's order */ -}}
{{- $out = concat $new $out -}}
{{- end -}}
{{- $_ := set .holder .key $out -}}
{{- end -}}

{{- /* .obj, .op: {op, path, value} */ -}}
{{- define "nw.jsonpatch" -}}
{{- $segs := list -}}
{{- range $s := rest (splitList "/" .op.path) -}}
{{- $segs = append $segs (replace "~0" "~" (replace "~1" "/" $s)) -}}
{{- end -}}
{{- $parent := .obj -}}
{{- range $s := initial $segs -}}
{{- if kindIs "slice" $parent -}}
{{- $parent = index $parent (atoi $s) -}}
{{- else -}}
{{- $parent = get $parent $s -}}
{{- end -}}
{{- end -}}
{{- $last := last $segs -}}
{{- if not (has .op.op (list "add" "replace")) -}}
{{- fail (printf "JSON patch op %q at %s: the chart applies only add and replace" .op.op .op.path) -}}
{{- end -}}
{{- if kindIs "map" $parent -}}
{{- $_ := set $parent $last (deepCopy .op.value) -}}
{{- else -}}
{{- /* a list: append at "-" needs the list's own holder */ -}}
{{- $holder := .obj -}}
{{- range $s := initial (initial $segs) -}}
{{- if kindIs "slice" $holder -}}{{- $holder = index $holder (atoi $s) -}}{{- else -}}{{- $holder = get $holder $s -}}{{- end -}}
{{- end -}}
{{- $listKey := last (initial $segs) -}}
{{- if eq $last "-" -}}
{{- $_ := set $holder $listKey (append $parent (deepCopy .op.value)) -}}
{{- else -}}
{{- fail (printf "JSON patch path %s: only '-' is supported inside a list" .op.path) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* .obj, .target: prints "true" when the object is the target */ -}}
{{- define "nw.matches" -}}
{{- $o := .obj -}}
{{- $t := .target -}}
{{- $ok := true -}}
{{- $gv := splitList "/" $o.apiVersion -}}
{{- $group := ternary "" (first $gv) (eq (len $gv) 1) -}}
{{- if and (hasKey $t "group") (ne $t.group $group) -}}{{- $ok = false -}}{{- end -}}
{{- if and (hasKey $t "version") (ne $t.version (last $gv)) -}}{{- $ok = false -}}{{- end -}}
{{- if and (hasKey $t "kind") (ne $t.kind $o.kind) -}}{{- $ok = false -}}{{- end -}}
{{- if and (hasKey $t "name") (not (regexMatch (printf "^(%s)$" $t.name) $o.metadata.name)) -}}{{- $ok = false -}}{{- end -}}
{{- if $ok -}}true{{- end -}}
{{- end -}}

{{- /* .objs (a holder dict with key "list"), .patches, .dir: the kustomization's directory */ -}}
{{- define "nw.patches" -}}
{{- $holder := .holder -}}
{{- $files := .files -}}
{{- $dir := .dir -}}
{{- range $p := .patches -}}
{{- $text := $p.patch -}}
{{- if $p.path -}}{{- $text = $files.Get (printf "%s/%s" $dir $p.path) -}}{{- end -}}
{{- if not $text -}}{{- fail (printf "%s: a patch with neither patch nor a readable path" $dir) -}}{{- end -}}
{{- $ops := fromYamlArray $text -}}
{{- $json := false -}}
{{- if and $ops (kindIs "map" (index $ops 0)) -}}{{- $json = hasKey (index $ops 0) "op" -}}{{- end -}}
{{- if $json -}}
{{- if not $p.target -}}{{- fail (printf "%s: a JSON patch without a target" $dir) -}}{{- end -}}
{{- range $o := $holder.list -}}
{{- if include "nw.matches" (dict "obj" $o "target" $p.target) -}}
{{- range $op := $ops -}}{{- include "nw.jsonpatch" (dict "obj" $o "op" $op) -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- $smp := fromYaml $text -}}
{{- $target := $p.target | default (dict "kind" $smp.kind "name" $smp.metadata.name) -}}
{{- $kept := list -}}
{{- range $o := $holder.list -}}
{{- if include "nw.matches" (dict "obj" $o "target" $target) -}}
{{- if ne (toString (get $smp "$patch")) "delete" -}}
{{- $body := omit $smp "apiVersion" "kind" "metadata" -}}
{{- include "nw.merge" (dict "dst" $o "src" $body) -}}
{{- $kept = append $kept $o -}}
{{- end -}}
{{- else -}}
{{- $kept = append $kept $o -}}
{{- end -}}
{{- end -}}
{{- $_ := set $holder "list" $kept -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* .holder, .files, .dir, .transformers (file names), .namespace */ -}}
{{- define "nw.transformers" -}}
{{- $holder := .holder -}}
{{- $ns := .namespace -}}
{{- $files := .files -}}
{{- $dir := .dir -}}
{{- range $f := .transformers -}}
{{- $t := fromYaml ($files.Get (printf "%s/%s" $dir $f)) -}}
{{- if eq $t.kind "NamespaceTransformer" -}}
{{- range $o := $holder.list -}}
{{- if not (has $o.kind (list "Namespace" "ClusterRole" "ClusterRoleBinding" "ValidatingAdmissionPolicy" "ValidatingAdmissionPolicyBinding")) -}}
{{- $_ := set $o.metadata "namespace" $ns -}}
{{- end -}}
{{- if has $o.kind (list "RoleBinding" "ClusterRoleBinding") -}}
{{- range $s := $o.subjects -}}
{{- if eq $s.kind "ServiceAccount" -}}{{- $_ := set $s "namespace" $ns -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq $o.kind "ValidatingAdmissionPolicyBinding") $o.spec.paramRef -}}
{{- $_ := set $o.spec.paramRef "namespace" $ns -}}
{{- end -}}
{{- end -}}
{{- else if eq $t.kind "PatchTransformer" -}}
{{- include "nw.patches" (dict "holder" $holder "files" $files "dir" $dir "patches" (list (dict "patch" $t.patch "target" $t.target))) -}}
{{- else -}}
{{- fail (printf "%s/%s: transformer kind %s is not applied by the chart" $dir $f $t.kind) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* .holder, .files, .dir, .generators: configMapGenerator entries; .config: values merged over config.yaml */ -}}
{{- define "nw.generate" -}}
{{- $holder := .holder -}}
{{- $files := .files -}}
{{- $dir := .dir -}}
{{- range $g := .generators -}}
{{- $data := dict -}}
{{- range $f := $g.files -}}
{{- $data = set $data (base $f) ($files.Get (printf "%s/%s" $dir $f)) -}}
{{- end -}}
{{- $cm := dict "apiVersion" "v1" "kind" "ConfigMap" "metadata" (dict "name" $g.name) "data" $data -}}
{{- $kept := list -}}
{{- range $o := $holder.list -}}
{{- if and (eq $g.behavior "replace") (eq $o.kind "ConfigMap") (eq $o.metadata.name $g.name) -}}
{{- $_ := set $o "data" $data -}}
{{- end -}}
{{- $kept = append $kept $o -}}
{{- end -}}
{{- if ne $g.behavior "replace" -}}{{- $kept = append $kept $cm -}}{{- end -}}
{{- $_ := set $holder "list" $kept -}}
{{- end -}}
{{- end -}}
