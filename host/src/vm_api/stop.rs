//! StopVM's ladder: the agent's clean power-off (half the budget), then ACPI until the
//! deadline, then pulling the plug; each step reported with what it did.

use super::{VmApi, VmError, VmResult, DEFAULT_STOP_TIMEOUT_S, STOP_POLL_MS};
use crate::hypervisor::{HypervisorError, PowerState};
use crate::pb;
use std::time::{Duration, Instant};

impl VmApi {
    /// Polls until the domain is no longer active or `deadline` passes.
    async fn wait_inactive(&self, uuid: &str, deadline: Instant) -> bool {
        loop {
            match self.power_state(uuid).await {
                Ok(s) if !s.is_active() => return true,
                Err(VmError::Hypervisor(HypervisorError::NoDomain(_))) => return true,
                _ => {}
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(STOP_POLL_MS)).await;
        }
    }

    pub async fn stop_vm(&self, request: pb::StopVmRequest) -> VmResult<pb::StopVmResponse> {
        self.stop_inner(request).await
    }

    async fn stop_inner(&self, request: pb::StopVmRequest) -> VmResult<pb::StopVmResponse> {
        let uuid = self.resolve(&request.vm_id).await?;
        let state = self
            .require_state(
                &uuid,
                &[
                    PowerState::Running,
                    PowerState::Paused,
                    PowerState::ShuttingDown,
                    PowerState::PmSuspended,
                ],
                "stop",
            )
            .await?;
        let timeout_s = if request.timeout_s == 0 {
            DEFAULT_STOP_TIMEOUT_S
        } else {
            request.timeout_s
        };
        let begin = Instant::now();
        let deadline = begin + Duration::from_secs(u64::from(timeout_s));
        let mut steps = Vec::new();
        let mut stopped_by = pb::StopStep::Unspecified;
        let paused = state == PowerState::Paused;

        // 1. The agent: a clean power-off from inside the guest. Gets half the budget.
        let agent_step = step_start(pb::StopStep::Agent);
        if request.skip_agent || paused {
            let why = if paused {
                "VM is paused"
            } else {
                "skipped by request"
            };
            steps.push(step_done(agent_step, false, false, why));
        } else {
            match self
                .agent
                .power(&uuid, qx_proto::agent::PowerAction::Shutdown, 0)
                .await
            {
                Ok(reply) => {
                    let agent_deadline = begin + Duration::from_secs(u64::from(timeout_s)) / 2;
                    let off = self.wait_inactive(&uuid, agent_deadline).await;
                    let detail = if off {
                        format!("guest powered off ({})", reply.method)
                    } else {
                        format!("agent accepted ({}) but the VM still runs", reply.method)
                    };
                    steps.push(step_done(agent_step, true, off, &detail));
                    if off {
                        stopped_by = pb::StopStep::Agent;
                    }
                }
                Err(e) => {
                    let detail = format!("agent unavailable: {e}");
                    steps.push(step_done(agent_step, true, false, &detail));
                }
            }
        }

        // 2. ACPI power button, until the deadline.
        if stopped_by == pb::StopStep::Unspecified {
            let acpi_step = step_start(pb::StopStep::Acpi);
            if paused {
                steps.push(step_done(acpi_step, false, false, "VM is paused"));
            } else {
                let id = uuid.clone();
                match self.run(move |hv| Ok(hv.shutdown(&id)?)).await {
                    Ok(()) => {
                        let off = self.wait_inactive(&uuid, deadline).await;
                        let detail = if off {
                            "guest powered off on ACPI shutdown"
                        } else {
                            "no power-off before the timeout"
                        };
                        steps.push(step_done(acpi_step, true, off, detail));
                        if off {
                            stopped_by = pb::StopStep::Acpi;
                        }
                    }
                    Err(VmError::Hypervisor(HypervisorError::WrongState(_)))
                        if self.wait_inactive(&uuid, Instant::now()).await =>
                    {
                        steps.push(step_done(acpi_step, true, true, "already off"));
                        stopped_by = pb::StopStep::Acpi;
                    }
                    Err(e) => steps.push(step_done(acpi_step, true, false, &e.to_string())),
                }
            }
        }

        // 3. Pull the plug.
        if stopped_by == pb::StopStep::Unspecified {
            let force_step = step_start(pb::StopStep::Force);
            let id = uuid.clone();
            match self.run(move |hv| Ok(hv.destroy(&id)?)).await {
                Ok(()) => {
                    steps.push(step_done(force_step, true, true, "destroyed"));
                    stopped_by = pb::StopStep::Force;
                }
                Err(e) => {
                    // Stopped by itself between the last poll and the destroy?
                    if self.wait_inactive(&uuid, Instant::now()).await {
                        steps.push(step_done(force_step, true, true, "already off"));
                        stopped_by = pb::StopStep::Force;
                    } else {
                        steps.push(step_done(force_step, true, false, &e.to_string()));
                        self.refresh().await;
                        return Err(e);
                    }
                }
            }
        }
        self.refresh().await;
        let mut status = self.status(&uuid).await?;
        status.state_reason = format!("stopped by {}", stop_step_name(stopped_by));
        Ok(pb::StopVmResponse {
            status: Some(status),
            steps: steps.into_iter().map(|(r, _)| r).collect(),
            stopped_by: stopped_by as i32,
        })
    }
}

fn step_start(step: pb::StopStep) -> (pb::StopStepResult, Instant) {
    (
        pb::StopStepResult {
            step: step as i32,
            ..Default::default()
        },
        Instant::now(),
    )
}

fn step_done(
    (mut r, at): (pb::StopStepResult, Instant),
    attempted: bool,
    succeeded: bool,
    detail: &str,
) -> (pb::StopStepResult, Instant) {
    r.attempted = attempted;
    r.succeeded = succeeded;
    r.detail = detail.to_string();
    r.elapsed_ms = u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX);
    (r, at)
}

fn stop_step_name(step: pb::StopStep) -> &'static str {
    match step {
        pb::StopStep::Agent => "agent",
        pb::StopStep::Acpi => "acpi",
        pb::StopStep::Force => "force",
        pb::StopStep::Unspecified => "nothing",
    }
}
