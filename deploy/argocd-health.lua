-- Argo CD health check for derpfleet.io DerpRegion resources.
-- Install: argocd-cm key "resource.customizations.health.derpfleet.io_DerpRegion"
-- (see the README's GitOps section). Reads the operator's conditions:
-- Degraded=True is Degraded, rolling out or not yet Ready is Progressing,
-- Ready=True is Healthy. A status written for an older generation is Progressing.
local health = {status = "Progressing", message = "waiting for the derpfleet operator"}
if obj.status == nil then
  return health
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= obj.metadata.generation then
  health.message = "waiting for the operator to observe generation " .. obj.metadata.generation
  return health
end
local by_type = {}
for _, condition in ipairs(obj.status.conditions or {}) do
  by_type[condition.type] = condition
end
local function holds(kind)
  return by_type[kind] ~= nil and by_type[kind].status == "True"
end
if holds("Degraded") then
  return {status = "Degraded", message = by_type.Degraded.message}
end
if holds("Progressing") then
  return {status = "Progressing", message = by_type.Progressing.message}
end
if holds("Ready") then
  return {status = "Healthy", message = by_type.Ready.message}
end
if by_type.Ready ~= nil then
  health.message = by_type.Ready.message
end
return health
