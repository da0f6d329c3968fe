//! A node agent for reconciler tests: records each call and answers from a script. A call the
//! script makes fail returns that error; everything else succeeds with plausible figures.

use super::*;
use std::sync::Mutex;

#[derive(Default)]
pub struct FakeAgent {
    /// Each call as `op node id`.
    pub calls: Mutex<Vec<String>>,
    /// Operation name → the error it returns.
    pub failures: Mutex<BTreeMap<String, AgentError>>,
    pub creates: Mutex<Vec<CreateRequest>>,
    pub checkpoints: Mutex<Vec<CheckpointRequest>>,
    pub commits: Mutex<Vec<CommitRequest>>,
    pub network_updates: Mutex<Vec<NetworkUpdateRequest>>,
}

impl FakeAgent {
    pub fn fail(&self, op: &str, err: AgentError) {
        self.failures.lock().unwrap().insert(op.into(), err);
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn call(&self, op: &str, node: &str, id: &str) -> Result<(), AgentError> {
        self.calls.lock().unwrap().push(format!("{op} {node} {id}"));
        match self.failures.lock().unwrap().get(op) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl NodeAgent for FakeAgent {
    async fn create(&self, node: &str, req: &CreateRequest) -> Result<SandboxInfo, AgentError> {
        self.call("create", node, &req.id)?;
        self.creates.lock().unwrap().push(req.clone());
        Ok(SandboxInfo {
            id: req.id.clone(),
            state: SandboxState::Running,
            init_pid: Some(4242),
        })
    }
    async fn pause(&self, node: &str, id: &str) -> Result<(), AgentError> {
        self.call("pause", node, id)
    }
    async fn resume(&self, node: &str, id: &str) -> Result<(), AgentError> {
        self.call("resume", node, id)
    }
    async fn hibernate(&self, node: &str, id: &str) -> Result<CheckpointInfo, AgentError> {
        self.call("hibernate", node, id)?;
        Ok(CheckpointInfo {
            checkpoint_id: id.into(),
            size_bytes: 100 << 20,
            duration_ms: 200,
        })
    }
    async fn wake(&self, node: &str, id: &str) -> Result<(), AgentError> {
        self.call("wake", node, id)
    }
    async fn checkpoint(
        &self,
        node: &str,
        id: &str,
        req: &CheckpointRequest,
    ) -> Result<CheckpointInfo, AgentError> {
        self.call("checkpoint", node, id)?;
        self.checkpoints.lock().unwrap().push(req.clone());
        Ok(CheckpointInfo {
            checkpoint_id: req.checkpoint_id.clone(),
            size_bytes: 52_428_800,
            duration_ms: 310,
        })
    }
    async fn delete_checkpoint(&self, node: &str, checkpoint_id: &str) -> Result<(), AgentError> {
        self.call("delete_checkpoint", node, checkpoint_id)
    }
    async fn commit(
        &self,
        node: &str,
        id: &str,
        req: &CommitRequest,
    ) -> Result<CommitInfo, AgentError> {
        self.call("commit", node, id)?;
        self.commits.lock().unwrap().push(req.clone());
        Ok(CommitInfo {
            digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                .into(),
            size_bytes: 4096,
            duration_ms: 54,
        })
    }
    async fn delete(&self, node: &str, id: &str) -> Result<(), AgentError> {
        self.call("delete", node, id)
    }
    async fn metrics(
        &self,
        node: &str,
        id: &str,
    ) -> Result<warren_runtime::SandboxStats, AgentError> {
        self.call("metrics", node, id)?;
        Ok(warren_runtime::SandboxStats {
            cpu_usage_ns: 3_000_000_000,
            memory_bytes: 96 << 20,
            memory_cache_bytes: 32 << 20,
            disk_bytes: 4 << 20,
            disk_total_bytes: 0,
        })
    }
    async fn update_network(
        &self,
        node: &str,
        id: &str,
        req: &NetworkUpdateRequest,
    ) -> Result<(), AgentError> {
        self.call("update_network", node, id)?;
        self.network_updates.lock().unwrap().push(req.clone());
        Ok(())
    }
}
