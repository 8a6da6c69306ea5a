-- Argo CD health check for the four kvm-operator.io kinds. Use this same script for each of
-- resource.customizations.health.kvm-operator.io_KvmNode, _StoragePool, _VirtualMachine and
-- _Migration in argocd-cm (see the chart's README section "GitOps").
--
-- Healthy: the operator has seen the current generation and Ready is True (a Migration: Succeeded).
-- Progressing: no status yet, an older generation, or Ready=False for a reason that passes on its
--   own (reconciling, provisioning, waiting for a migration slot, migrating).
-- Suspended: a VM stopped or paused by its spec, a node in maintenance.
-- Degraded: Ready=False for any other reason (the message says what to fix), a failed or
--   cancelled Migration.
local hs = { status = "Progressing", message = "Waiting for the operator" }
local st = obj.status
if st == nil then
  return hs
end
local gen = obj.metadata and obj.metadata.generation
if gen ~= nil and (st.observedGeneration == nil or st.observedGeneration < gen) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(gen)
  return hs
end
local function condition(t)
  for _, c in ipairs(st.conditions or {}) do
    if c.type == t then
      return c
    end
  end
  return nil
end
local function text(c)
  return (c.reason or "") .. ": " .. (c.message or "")
end

if obj.kind == "Migration" then
  local phase = st.phase or "Pending"
  if phase == "Succeeded" then
    hs.status = "Healthy"
    hs.message = "Moved to " .. tostring(st.targetNode)
  elseif phase == "Failed" or phase == "Cancelled" then
    hs.status = "Degraded"
    hs.message = phase .. ": " .. (st.message or "")
  else
    hs.status = "Progressing"
    local pct = st.progress and st.progress.percent or ""
    hs.message = phase .. " " .. pct
  end
  return hs
end

local ready = condition("Ready")
if ready == nil then
  return hs
end
local passing = {
  Reconciling = true, Provisioning = true, Pending = true, Scheduling = true,
  Migrating = true, Queued = true, WaitingForSlot = true, Evacuating = true,
}
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or ""
  if obj.kind == "VirtualMachine" and (st.powerState == "Stopped" or st.powerState == "Paused") then
    hs.status = "Suspended"
  end
  if obj.kind == "KvmNode" then
    local sched = condition("Schedulable")
    if sched ~= nil and sched.status == "False" then
      hs.status = "Suspended"
      hs.message = text(sched)
    end
  end
elseif passing[ready.reason] then
  hs.status = "Progressing"
  hs.message = text(ready)
else
  hs.status = "Degraded"
  hs.message = text(ready)
end
return hs
