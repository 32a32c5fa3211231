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
    for thread in threads { pthread_join(thread, nil) }
}

import Synchronization

/// A value behind a lock that escaping closures and tasks can share.
public final class Shared<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    public init(_ value: Value) { mutex = Mutex(value) }
    public func withLock<R>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
    public var value: Value { mutex.withLock { $0 } }
}
