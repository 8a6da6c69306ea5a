//! API calls pinned with kube's tower-test mock (no kube-apiserver can run here): each test
//! states the exact requests the operator makes and answers them as an apiserver would.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kvm_operator::api;

fn crd_names() -> Vec<String> {
    api::crds()
        .into_iter()
        .map(|c| c.metadata.name.unwrap_or_default())
        .collect()
}

async fn answer_crd_gets(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    absent: Option<&str>,
) {
    for (want, crd) in crd_names().into_iter().zip(api::crds()) {
        let (req, send) = handle.next_request().await.expect("a GET per CRD");
        assert_eq!(req.method(), http::Method::GET);
        assert_eq!(
            req.uri().path(),
            format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{want}")
        );
        if absent == Some(want.as_str()) {
            let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": format!("customresourcedefinitions.apiextensions.k8s.io \"{want}\" not found")});
            send.send_response(
                Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(Body::from(serde_json::to_vec(&status).unwrap()))
                    .unwrap(),
            );
        } else {
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&crd).unwrap()))
                    .unwrap(),
            );
        }
    }
}

#[tokio::test]
async fn preflight_reads_each_crd_by_name_and_passes_when_all_exist() {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(answer_crd_gets(handle, None));
    kvm_operator::cli::check_crds(kube::Client::new(svc, "default"))
        .await
        .unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn preflight_names_a_missing_crd_and_the_fix() {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(answer_crd_gets(
        handle,
        Some("virtualmachines.kvm-operator.io"),
    ));
    let err = kvm_operator::cli::check_crds(kube::Client::new(svc, "default"))
        .await
        .unwrap_err()
        .to_string();
    server.await.unwrap();
    assert!(err.contains("virtualmachines.kvm-operator.io"), "{err}");
    assert!(!err.contains("kvmnodes"), "{err}");
    assert!(err.contains("kubectl apply"), "{err}");
}

#[tokio::test]
async fn preflight_reports_forbidden_with_the_rbac_fix() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let (_req, send) = handle.next_request().await.expect("GET");
        let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "Forbidden", "code": 403, "message": "forbidden"});
        send.send_response(
            Response::builder()
                .status(StatusCode::FORBIDDEN)
                .body(Body::from(serde_json::to_vec(&status).unwrap()))
                .unwrap(),
        );
    });
    let err = kvm_operator::cli::check_crds(kube::Client::new(svc, "default"))
        .await
        .unwrap_err()
        .to_string();
    server.await.unwrap();
    assert!(
        err.contains("needs get on customresourcedefinitions"),
        "{err}"
    );
}
