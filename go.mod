module github.com/tcpproxy/tcpproxy

go 1.26
