#if canImport(Glibc)
import Glibc
#endif

private final class ThreadBody: @unchecked Sendable {
    // Immutable after init; handed to exactly one pthread, which releases it.
    let index: Int
    let body: @Sendable (Int) -> Void
    init(index: Int, body: @escaping @Sendable (Int) -> Void) {
        self.index = index
        self.body = body
    }
}

/// Runs `body(0..<count)` on `count` real OS threads at once and waits for all of them.
///
/// Stress tests need true parallelism; a cooperative task pool on a 2-core machine would
/// serialise them.
public func runThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
    for thread in startThreads(count, body) { pthread_join(thread, nil) }
}

/// ``runThreads(_:_:)`` for async callers: waits without holding a thread of Swift's cooperative
/// pool (a joiner thread joins them), so that tasks elsewhere in the process keep running
/// meanwhile. On 2 cores the pool has 2 threads; two tests blocked in `pthread_join` stopped every
/// task, a cluster's membership service included.
public func runThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) async {
    let threads = startThreads(count, body)
    await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
        let joiner = Unmanaged.passRetained(Joiner(threads: threads, continuation: continuation)).toOpaque()
        var thread = pthread_t()
        let result = pthread_create(&thread, nil, { raw in
            let joiner = Unmanaged<Joiner>.fromOpaque(raw!).takeRetainedValue()
            for thread in joiner.threads { pthread_join(thread, nil) }
            joiner.continuation.resume()
            return nil
        }, joiner)
        precondition(result == 0, "pthread_create failed: \(result)")
        pthread_detach(thread)
    }
}

private final class Joiner: @unchecked Sendable {
    // Immutable after init; handed to exactly one pthread, which releases it.
    let threads: [pthread_t]
    let continuation: CheckedContinuation<Void, Never>
    init(threads: [pthread_t], continuation: CheckedContinuation<Void, Never>) {
        self.threads = threads
        self.continuation = continuation
    }
}

/// Starts `body(0..<count)` on `count` OS threads; the caller joins them.
private func startThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) -> [pthread_t] {
    var threads: [pthread_t] = []
    for index in 0..<count {
        let box = Unmanaged.passRetained(ThreadBody(index: index, body: body)).toOpaque()
        var thread = pthread_t()
        let result = pthread_create(&thread, nil, { raw in
            let work = Unmanaged<ThreadBody>.fromOpaque(raw!).takeRetainedValue()
            work.body(work.index)
            return nil
        }, box)
        precondition(result == 0, "pthread_create failed: \(result)")
        threads.append(thread)
    }
    return threads
}

import Synchronization

/// A value behind a lock that escaping closures and tasks can share.
public final class Shared<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    public init(_ value: Value) { mutex = Mutex(value) }
    public func withLock<R>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
    public var value: Value { mutex.withLock { $0 } }
}
