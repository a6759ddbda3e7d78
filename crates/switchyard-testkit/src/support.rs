//! Small pieces the adapters' own broker-specific tests share.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use switchyard_core::{Context, Delivery, DeliveryStream, HandleError, Message, Router};

/// How long [`next_delivery`] waits.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The next delivery of `stream`; panics if none comes within
/// [`DELIVERY_TIMEOUT`], if the stream ends, or if it yields an error.
pub async fn next_delivery(stream: &mut DeliveryStream) -> Delivery {
    tokio::time::timeout(DELIVERY_TIMEOUT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery within {DELIVERY_TIMEOUT:?}"))
        .expect("the subscription ended")
        .expect("the subscription failed")
}

/// A router whose one route, for `M`, fails every call with `error()`: a
/// poison message. The counter says how many times the handler ran.
pub fn failing_router<M: Message>(error: fn() -> HandleError) -> (Router, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let router = Router::builder()
        .route({
            let calls = Arc::clone(&calls);
            move |_: M, _: Context| {
                calls.fetch_add(1, Ordering::SeqCst);
                let e = error();
                async move { Err::<(), _>(e) }
            }
        })
        .build();
    (router, calls)
}

/// A file holding `text` under a fresh name in a directory of the system's
/// temporary directory (`switchyard-tests`), removed when dropped: a
/// configuration file for a test.
pub struct TempFile(std::path::PathBuf);

impl TempFile {
    /// Writes `text` to a new file whose name ends in `.{extension}`.
    ///
    /// # Panics
    ///
    /// If the file cannot be written.
    pub fn new(extension: &str, text: &str) -> Self {
        let dir = std::env::temp_dir().join("switchyard-tests");
        std::fs::create_dir_all(&dir).expect("cannot create the temporary directory");
        let path = dir.join(format!(
            "{}.{extension}",
            switchyard_core::MessageId::new().as_str()
        ));
        std::fs::write(&path, text).expect("cannot write the temporary file");
        TempFile(path)
    }

    /// Where it is.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
