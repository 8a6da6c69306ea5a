//! The four custom resources (group `kvm-operator.io`, version `v1alpha1`). Data only.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub mod condition;
pub mod kvm_node;
pub mod migration;
pub mod quantity;
pub mod storage_pool;
pub mod validation;
pub mod virtual_machine;

pub use kvm_node::{KvmNode, KvmNodeSpec, KvmNodeStatus};
pub use migration::{Migration, MigrationPhase, MigrationSpec, MigrationStatus};
pub use quantity::ByteQuantity;
pub use storage_pool::{StoragePool, StoragePoolSpec, StoragePoolStatus};
pub use validation::{FieldError, FieldErrors};
pub use virtual_machine::{VirtualMachine, VirtualMachineSpec, VirtualMachineStatus};

/// API group of every kind.
pub const GROUP: &str = "kvm-operator.io";
/// API version of every kind.
pub const VERSION: &str = "v1alpha1";

/// The CRDs of all four kinds, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        KvmNode::crd(),
        StoragePool::crd(),
        VirtualMachine::crd(),
        Migration::crd(),
    ]
}
