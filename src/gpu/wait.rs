//! Waiting for the device. Every wait of the engine is a future at its core: in a browser
//! the page's event loop must turn for WebGPU to answer, so nothing there may block. Native
//! callers keep blocking calls, which drive the same futures to completion here.

#[cfg(target_arch = "wasm32")]
use crate::error::Error;
use crate::error::Result;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// Drives `future` to completion. Natively it blocks. In a browser it can only take a
/// future that is complete at once; one that would have to wait fails, naming the async
/// call (`async_form`) to use instead, rather than hanging the page.
pub(crate) fn block_on<T>(future: impl Future<Output = Result<T>>, async_form: &str) -> Result<T> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = async_form;
        pollster::block_on(future)
    }
    #[cfg(target_arch = "wasm32")]
    {
        let mut future = std::pin::pin!(future);
        match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(Error::Invalid(format!(
                "a blocking wait for the device in the browser, which cannot block: use {async_form}"
            ))),
        }
    }
}

/// Runs `make` (a device call that may fail validation or run out of memory) inside an
/// error scope of `filter` and returns its result with the scope's error. A browser cannot
/// wait for the scope, so there the error goes to the device's uncaptured-error handler
/// instead and fails the next submission or readback ([`super::Gpu::check_device_error`]).
pub(crate) fn scoped<T>(
    device: &wgpu::Device,
    filter: wgpu::ErrorFilter,
    make: impl FnOnce() -> T,
) -> (T, Option<wgpu::Error>) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        let scope = device.push_error_scope(filter);
        let made = make();
        (made, pollster::block_on(scope.pop()))
    }
    #[cfg(target_arch = "wasm32")]
    {
        let _ = (device, filter);
        (make(), None)
    }
}

/// A value a device callback delivers later, awaited as a future.
pub(crate) struct Delivery<T>(Arc<Mutex<Slot<T>>>);

struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

/// A callback that hands its argument over, and the future that receives it.
pub(crate) fn delivery<T: Send + 'static>() -> (impl FnOnce(T) + Send + 'static, Delivery<T>) {
    let slot = Arc::new(Mutex::new(Slot { value: None, waker: None }));
    let sender = Arc::clone(&slot);
    let deliver = move |value| {
        let mut slot = sender.lock().unwrap_or_else(|p| p.into_inner());
        slot.value = Some(value);
        if let Some(waker) = slot.waker.take() {
            waker.wake();
        }
    };
    (deliver, Delivery(slot))
}

impl<T> Future for Delivery<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match slot.value.take() {
            Some(value) => Poll::Ready(value),
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn a_delivery_completes_once_its_callback_runs() {
        let (deliver, delivery) = delivery::<u32>();
        let mut delivery = Box::pin(delivery);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(delivery.as_mut().poll(&mut cx).is_pending());
        deliver(7);
        assert_eq!(delivery.as_mut().poll(&mut cx), Poll::Ready(7));
    }

    #[test]
    fn block_on_returns_the_futures_result() {
        assert_eq!(block_on(async { Ok(3) }, "x").unwrap(), 3);
        let err = block_on(async { Err::<(), _>(Error::Invalid("no".into())) }, "x").unwrap_err();
        assert_eq!(err.to_string(), "no");
    }
}
