import Foundation
import Granary
import GranaryMembership
import GranaryTestSupport
import GranaryTransport
import Synchronization
import Testing

/// A paused CPU of the host (`HostPauses`): a member whose lease thread is on it is paused with
/// it, and the CM, on another CPU, must not take it for failed. The pause here is a real-time
/// thread of higher priority spinning on one CPU while the member's lease thread is pinned there:
/// to that lease thread it is what a hypervisor's steal of the virtual CPU is.
@Suite("Host pauses", .serialized,
       .enabled(if: HostPauses.allowedCPUs.count >= 2 && geteuid() == 0,
                "needs 2 CPUs and root (pinned threads, real-time priority): \(HostPauses.allowedCPUs.count) CPUs, uid \(geteuid())"))
struct HostPauseTests {
    @Test("a member whose CPU is held for 60 ms, three times: with host pauses excused the CM removes no one; without, it removes that member (the pause is real)",
          .timeLimit(.minutes(1)), arguments: [true, false])
    func heldCPU(excused: Bool) async throws {
        let cluster = try await testCluster { options in
            var membership = MembershipOptions()
            membership.lease = .milliseconds(10)
            membership.excusesHostPauses = excused
            options.membership = membership
            options.logger.logLevel = .critical
        }
        try await eventually("a CM") { cluster.membership.contains(where: \.isManager) }
        let manager = cluster.membership.first(where: \.isManager)!.node
        try await waitForRenewals(cluster, manager: manager)
        let cpus = HostPauses.allowedCPUs
        let victim = cluster.nodes.map(\.id).first { $0 != manager }!
        // Every lease thread on the first CPU, the victim's alone on the second.
        for service in cluster.membership {
            let thread = service.leaseThreadID
            try #require(thread != 0, "\(service.node)'s lease thread has not started")
            try #require(HostPauses.pin(thread: thread, to: service.node == victim ? cpus[1] : cpus[0]),
                         "could not pin \(service.node)'s lease thread (\(thread))")
        }
        try await Task.sleep(for: .milliseconds(50))
        let before = cluster.nodes[manager.index].engine.configuration
        // (A removed node of an embedded cluster rejoins as a new incarnation: the service of the
        // one that ran says whether it was removed.)
        let victimService = try #require(cluster.membership.first { $0.node == victim })
        for _ in 0..<3 {
            try await Self.hold(cpus[1], for: .milliseconds(60))
            try await Task.sleep(for: .milliseconds(150))
        }
        if excused {
            let after = cluster.nodes[manager.index].engine.configuration
            #expect(after.id == before.id && !victimService.mustRejoin,
                    "the CM changed the configuration while \(victim)'s CPU was held: \(before.id) -> \(after)")
        } else {
            try await eventually("\(victim) removed", timeout: .seconds(5)) { victimService.mustRejoin }
        }
        try await cluster.shutdown()
    }

    /// Holds `cpu` for `duration`: a thread pinned to it spins at a real-time priority above
    /// every lease thread's.
    static func hold(_ cpu: Int32, for duration: Duration) async throws {
        let nanoseconds = duration.wholeNanoseconds
        let failure = Mutex<String?>(nil)
        await runThreads(1) { _ in
            guard HostPauses.pin(thread: 0, to: cpu) else {
                failure.withLock { $0 = "could not pin the holding thread to CPU \(cpu)" }
                return
            }
            var parameter = sched_param()
            parameter.sched_priority = 50
            guard pthread_setschedparam(pthread_self(), SCHED_FIFO, &parameter) == 0 else {
                failure.withLock { $0 = "could not raise the holding thread to real-time priority" }
                return
            }
            let start = monotonicNanoseconds()
            while monotonicNanoseconds() - start < nanoseconds {}
        }
        if let failure = failure.withLock({ $0 }) { Issue.record(Comment(rawValue: failure)) }
    }
}
